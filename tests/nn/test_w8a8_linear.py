"""W8A8Linear: weight mapping from the primitives, backends agree, static/dynamic, checkpoint round trip."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import llmq  # noqa: F401  (registers the "llmq" quantizer with transformers)
from llmq.kernels.act_quant import act_quant_reference
from llmq.nn.registry import build_module
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.quant.primitives import quantize_weight
from llmq.recipes import ActivationRecipe

sys.path.insert(0, str(Path(__file__).parents[1]))
from w8a8_tiny import tiny_llama, token_batches  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def linear(k=96, n=40, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.2)
    return lin


def sqnr_db(ref, y):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean())).item()


def test_signed_codes_are_primitive_codes_minus_128():
    lin = linear()
    layer = W8A8Linear.from_linear(lin)
    qw = quantize_weight(lin.weight.detach(), 8, None, True)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (40, 96)
    assert torch.equal(layer.qweight.to(torch.int16) + 128, qw.codes.to(torch.int16))
    assert torch.equal(layer.weight_scale, qw.scales[:, 0])
    torch.testing.assert_close(layer.dequantized_weight(), qw.dequantize())


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_reference_forward_is_exact_int_math(static):
    lin = linear()
    x = torch.randn(2, 7, 96)
    scale = x.abs().max() / 127.5 if static else None
    layer = W8A8Linear.from_linear(lin, scale, backend="torch")
    y = layer(x)
    assert y.shape == (2, 7, 40)
    # independent computation: float64 int dot of the codes, then the scales
    q, a_s = act_quant_reference(x.reshape(-1, 96), layer.act_scale)
    acc = q.double() @ layer.qweight.double().t()
    expect = (acc * a_s.double().reshape(-1, 1) * layer.weight_scale.double()[None, :] + lin.bias.double()[None, :])
    torch.testing.assert_close(y.reshape(-1, 40).double(), expect, rtol=1e-6, atol=1e-6)
    assert sqnr_db(lin(x), y) > 30


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("m", [1, 33], ids=["m1", "m33"])
def test_triton_backend_matches_torch(m, static, dtype, kernel_tol):
    lin = linear(k=80, n=48).to(dtype)
    x = torch.randn(m, 80).to(dtype)
    layer = W8A8Linear.from_linear(lin, 0.02 if static else None)
    layer.set_backend("torch")
    y_ref = layer(x)
    layer.set_backend("triton-interpret")
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **kernel_tol[dtype])


def test_backend_choice_cpu_and_forced_errors(monkeypatch):
    layer = W8A8Linear.from_linear(linear())
    x = torch.randn(3, 96)
    monkeypatch.delenv("LLMQ_BACKEND", raising=False)
    assert layer.backend_for(x).name == "torch"  # the interpreter is never auto-picked on CPU
    layer.set_backend("triton")
    with pytest.raises(ValueError, match="forced backend 'triton' cannot run .* needs a CUDA device"):
        layer(x)
    layer.set_backend("cuda-magic")
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'.*for the w8a8-matmul"):
        layer(x)


def test_static_scale_validation_and_fp16_rounding():
    with pytest.raises(ValueError, match="positive and finite"):
        W8A8Linear.from_linear(linear(), 0.0)
    layer = W8A8Linear.from_linear(linear(), 0.0123456)
    s = layer.act_scale.item()
    assert s >= 0.0123456 and torch.tensor(s).half().float().item() == s  # rounded up to fp16


def test_bad_input_width():
    with pytest.raises(ValueError, match="last dim 96"):
        W8A8Linear.from_linear(linear())(torch.randn(2, 95))


def test_config_round_trip():
    layer = W8A8Linear.from_linear(linear(), 0.05)
    cfg = layer.to_config()
    assert cfg == {"kind": "w8a8_linear", "in_features": 96, "out_features": 40, "bits": 8, "group_size": None,
                   "symmetric": True, "act_bits": 8, "act_scheme": "static"}
    empty = build_module(cfg, 96, 40, bias=True)
    assert isinstance(empty, W8A8Linear) and empty.static and empty.act_scale.shape == (1,)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="do not match"):
        build_module(cfg, 97, 40, bias=True)


@pytest.mark.parametrize("scheme, observer", [("dynamic", "minmax"), ("static", "minmax")], ids=["dynamic", "static-minmax"])
def test_tiny_llama_quantize_save_load(tmp_path, scheme, observer):
    from transformers import AutoModelForCausalLM

    from llmq.checkpoint import build_quantization_config, save_quantized
    from llmq.w8a8.quantize import quantize_model_w8a8, w8a8_weight_recipe

    model = tiny_llama()
    ids = token_batches(3)
    ref = model(input_ids=ids[0]).logits
    recipe = ActivationRecipe(scheme=scheme, observer=observer, smoothquant_alpha=0.5)
    summary = quantize_model_w8a8(model, recipe, ids, progress=False)
    assert summary.linears == 14 and summary.smoothed == 14
    assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == 14
    got = model(input_ids=ids[0]).logits
    assert sqnr_db(ref, got) > 20  # W8A8 stays close to the float model

    qcfg = build_quantization_config(model, w8a8_weight_recipe(), {"activation": recipe.to_dict()})
    save_quantized(model, None, tmp_path / "ckpt", qcfg)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    layer = loaded.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, W8A8Linear) and layer.static == (scheme == "static")
    if scheme == "static":
        orig = model.get_submodule("model.layers.1.mlp.down_proj")
        assert torch.equal(layer.act_scale, orig.act_scale)  # the calibrated scale is in the checkpoint
    torch.testing.assert_close(loaded(input_ids=ids[0]).logits, got, rtol=0, atol=0)
    assert loaded.config.quantization_config.to_dict()["activation"]["scheme"] == scheme


def test_static_without_data_is_a_clear_error():
    from llmq.w8a8.quantize import quantize_model_w8a8

    with pytest.raises(ValueError, match="need calibration data"):
        quantize_model_w8a8(tiny_llama(), ActivationRecipe(scheme="static", observer="kl"), [], progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("m", [1, 100, 1024], ids=lambda m: f"m{m}")
def test_cuda_picks_triton_and_matches_torch(m, static, kernel_tol):
    lin = linear(k=576, n=1536).half().cuda()
    x = torch.randn(m, 576, device="cuda", dtype=torch.float16)
    layer = W8A8Linear.from_linear(lin, 0.03 if static else None)
    y = layer(x)
    assert layer.backend_for(x).name == "triton"
    layer.set_backend("torch")
    torch.testing.assert_close(y, layer(x), **kernel_tol[torch.float16])


def test_dtype_casts_never_round_the_scales():
    """.bfloat16() would round the fp16-representable scales: they stay float32; the bias follows the model;
    .half() is exact."""
    layer = W8A8Linear.from_linear(torch.nn.Linear(64, 24), act_scale=torch.tensor(0.0123))
    weight_scale, act_scale = layer.weight_scale.clone(), layer.act_scale.clone()
    assert not torch.equal(weight_scale.bfloat16().float(), weight_scale)  # the rounding this guards against
    layer.bfloat16()
    assert layer.bias.dtype == torch.bfloat16 and layer.weight_scale.dtype == layer.act_scale.dtype == torch.float32
    assert torch.equal(layer.weight_scale, weight_scale) and torch.equal(layer.act_scale, act_scale)
    layer.half()
    assert layer.weight_scale.dtype == torch.float16
    assert torch.equal(layer.weight_scale.float(), weight_scale) and torch.equal(layer.act_scale.float(), act_scale)
