"""Layer-sequential W8A8 (``llmq.w8a8.layerwise``) on tiny random Llamas saved to disk."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, save_model_dir
from torch import nn
from transformers import AutoModelForCausalLM

import llmq
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.pipeline import driver
from llmq.pipeline.capture import LayerInputs, capture_layer0_inputs, forward_all
from llmq.recipes import ActivationRecipe
from llmq.w8a8 import calibration_batches, quantize_model_w8a8, quantize_w8a8
from llmq.w8a8.layerwise import quantize_layerwise_w8a8, smooth_layer

sys.path.insert(0, str(Path(__file__).parents[1]))
from w8a8_tiny import tiny_llama, token_batches  # noqa: E402

RECIPES = {
    "dynamic-sq": ActivationRecipe(scheme="dynamic", smoothquant_alpha=0.5),
    "static-mse-sq": ActivationRecipe(scheme="static", observer="mse", smoothquant_alpha=0.5),
    "static-minmax": ActivationRecipe(scheme="static", observer="minmax", smoothquant_alpha=None),
}


def outlier_llama(layers: int = 4, seed: int = 0):
    """``conftest.make_tiny_llama`` (the tiny tokenizer's vocabulary) with one LLM-like outlier hidden channel."""
    model = make_tiny_llama(layers=layers, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 20.0
            layer.post_attention_layernorm.weight[5] = 20.0
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 4-layer tiny Llama with outliers with its tokenizer, saved like a hub download."""
    return save_model_dir(outlier_llama(), tmp_path_factory.mktemp("outliers") / "llama")


def sqnr_db(ref, y):
    return (10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum())).item()


def calib(n=4, seq=32):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 320, (1, seq), generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", list(RECIPES), ids=list(RECIPES))
def test_checkpoint_loads_and_stays_close_to_fp(model_dir, tmp_path, name):
    recipe = RECIPES[name]
    result = quantize_w8a8(model_dir, recipe, tmp_path / "q", n_samples=4, seq_len=32, batch_size=3,
                           progress=False)
    assert result.summary.linears == 4 * 7 and result.summary.peak_rss_mb > 0
    assert result.summary.smoothed == (4 * 7 if recipe.smoothquant_alpha is not None else 0)
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded, _ = llmq.load(result.out_dir)
    plain = AutoModelForCausalLM.from_pretrained(result.out_dir).eval()
    assert sum(isinstance(m, W8A8Linear) for m in loaded.modules()) == 4 * 7
    x = torch.cat(calibration_batches(make_tiny_tokenizer(), 2, 20, seed=5))  # text like the calibration's
    with torch.no_grad():
        ref, got = fp(x).logits, loaded(x).logits
        assert torch.equal(got, result.model(x).logits)
        assert torch.equal(got, plain(x).logits)
    assert sqnr_db(ref, got) > (30 if recipe.scheme.value == "dynamic" else 20)  # in-memory path: 35, 25, 23 dB
    assert not torch.equal(ref, got)  # the activations really were quantized


def test_dynamic_without_smoothing_equals_in_memory(model_dir):
    """No calibration at all: the layer-sequential checkpoint is the in-memory one, bit for bit."""
    recipe = ActivationRecipe(scheme="dynamic", smoothquant_alpha=None)
    lazy, summary = quantize_layerwise_w8a8(model_dir, recipe, None, progress=False)
    full = outlier_llama()
    quantize_model_w8a8(full, recipe, None, progress=False)
    a, b = lazy.state_dict(), full.state_dict()
    assert a.keys() == b.keys() and summary.calibration_samples == 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["static-mse-sq", "static-minmax"])
def test_layer0_is_calibrated_like_in_memory(model_dir, name):
    """Layer 0 sees the same inputs in both drivers: same smoothed norms and static scales. Later layers
    see the quantized layers' outputs here (the sequential choice) and the float model's there."""
    recipe, batches = RECIPES[name], calib()
    lazy, _ = quantize_layerwise_w8a8(model_dir, recipe, batches, batch_size=3, progress=False)
    full = outlier_llama()
    quantize_model_w8a8(full, recipe, batches, progress=False)
    a, b = lazy.state_dict(), full.state_dict()
    layer0 = [k for k in a if k.startswith("model.layers.0.")]
    assert any(k.endswith("act_scale") for k in layer0)
    for k in layer0:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    later = [k for k in a if k.startswith("model.layers.3.") and k.endswith("act_scale")]
    assert any(not torch.equal(a[k], b[k]) for k in later)


def test_one_float_layer_materialised_at_a_time(model_dir, monkeypatch):
    seen = []
    real = driver.materialise

    def spy(model, prefix, ckpt, device, *args, **kwargs):
        layers = model.model.layers
        if prefix.startswith("model.layers."):
            i = int(prefix.split(".")[2])
            float_layers = [j for j, layer in enumerate(layers)
                            if any(not p.is_meta for m in layer.modules() if isinstance(m, nn.Linear)
                                   for p in m.parameters())]
            assert float_layers == [], f"materialising layer {i} while layers {float_layers} hold float Linears"
            assert all(p.is_meta for layer in layers[i:] for p in layer.parameters())
            assert all(not any(isinstance(m, nn.Linear) for m in layer.modules()) for layer in layers[:i])
            seen.append(i)
        return real(model, prefix, ckpt, device, *args, **kwargs)

    monkeypatch.setattr(driver, "materialise", spy)
    model, _ = quantize_layerwise_w8a8(model_dir, RECIPES["static-mse-sq"], calib(2), progress=False)
    assert seen == [0, 1, 2, 3]
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("alpha", [0.5, 0.85], ids=["a0.5", "a0.85"])
def test_per_layer_fold_leaves_float_layer_outputs_unchanged(alpha):
    model = tiny_llama().double()  # float64: the check is about the algebra (GQA v->o, up->down), not rounding
    layers = model.model.layers
    inputs = capture_layer0_inputs(model, layers, torch.cat(token_batches(3)), 2, torch.device("cpu"),
                                   torch.device("cpu"))
    state = {"batch": 0, "device": torch.device("cpu")}

    def outputs(layer):
        out = LayerInputs(list(inputs.hidden), inputs.kwargs)
        forward_all(layer, out, torch.device("cpu"), {}, state, advance=True)
        return out.hidden

    for i, layer in enumerate(layers):
        ref = outputs(layer)
        smoothed = smooth_layer(layer, f"model.layers.{i}", inputs, torch.device("cpu"), alpha)
        assert len(smoothed) == 7
        for r, g in zip(ref, outputs(layer)):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
        inputs.hidden = ref


@pytest.mark.parametrize("batches", [None, [], [torch.zeros(1, 0, dtype=torch.long)]],
                         ids=["none", "empty", "0-tokens"])
@pytest.mark.parametrize("name", ["dynamic-sq", "static-minmax"])
def test_no_calibration_data_fails_before_work(model_dir, monkeypatch, batches, name):
    monkeypatch.setattr(driver, "empty_model", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(driver, "materialise", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="calibration"):
        quantize_layerwise_w8a8(model_dir, RECIPES[name], batches, progress=False)


def test_zero_calibration_samples_fail_before_loading(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "run_layerwise", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="need calibration data"):
        quantize_w8a8(model_dir, RECIPES["static-mse-sq"], tmp_path / "q", n_samples=0, progress=False)
    assert not (tmp_path / "q").exists()


def test_max_memory_too_small_fails_before_work(model_dir, tmp_path, monkeypatch, capsys):
    from llmq.cli.main import main

    monkeypatch.setattr(driver, "capture_layer0_inputs", lambda *a, **k: pytest.fail("work started"))
    code = main(["quantize", str(model_dir), "--method", "smoothquant", "--act-scheme", "static",
                 "--calib-samples", "2", "--max-memory", "1MB", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--max-memory is 1 MB" in capsys.readouterr().err


def test_selecting_lm_head_is_refused(model_dir):
    from llmq.w8a8.quantize import w8a8_weight_recipe

    with pytest.raises(ValueError, match="inside the decoder layers only"):
        quantize_layerwise_w8a8(model_dir, RECIPES["dynamic-sq"], calib(1), w8a8_weight_recipe(exclude=()),
                                progress=False)
